import { Parser, fromFile } from '@asyncapi/parser';
const { document, diagnostics } = await fromFile(new Parser(), process.argv[2]).parse();
const ops = document ? document.operations().all().map(op => ({
  id: op.id(), action: op.action(),
  channels: op.channels().all().map(c => c.id()),
  tags: op.tags().all().map(t => t.name()),
  reply: op.reply() ? op.reply().channel()?.id() ?? null : null,
})) : null;
console.log(JSON.stringify({ diagnostics: diagnostics.map(d => ({severity: d.severity, code: d.code, message: d.message, path: d.path})), operations: ops }));
