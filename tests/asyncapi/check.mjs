// Parse an AsyncAPI document with the official parser (@asyncapi/parser) and print, as JSON, its
// diagnostics and each operation as the parser reads it (id, action, channels, tags, reply
// channel), so tests/test_asyncapi.py can check both the verdict and the reading.
// Usage: node tests/asyncapi/check.mjs schemas/asyncapi.yaml
import { Parser, fromFile } from '@asyncapi/parser';

const { document, diagnostics } = await fromFile(new Parser(), process.argv[2]).parse();
const operations = document
  ? document.operations().all().map((op) => ({
      id: op.id(),
      action: op.action(),
      channels: op.channels().all().map((c) => c.id()),
      tags: op.tags().all().map((t) => t.name()),
      reply: op.reply() ? op.reply().channel()?.id() ?? null : null,
    }))
  : null;
console.log(JSON.stringify({
  diagnostics: diagnostics.map((d) => ({
    severity: d.severity, code: d.code, message: d.message, path: d.path,
  })),
  operations,
}));
