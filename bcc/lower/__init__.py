"""lower: run the pass list on a captured graph and compile it (inductor), hand it to Dynamo (backend) or export it.

Every lowering ends in a pure program and the one trajectory stepper that runs it
(:mod:`bcc.lower.stepper`); the runtime builds on both, and nothing here imports the runtime."""
