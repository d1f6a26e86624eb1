"""Ferry's tools: what people run, as opposed to the services that run on the bus.

``tools.cli`` is the ``ferry`` command (operator commands, the simulator, the demo);
``tools.stack`` starts and stops a whole local stack (``ferry up``/``down``) as child processes.
Both depend on ``services`` (its bus, contract and config); nothing in ``services`` imports them.
"""
