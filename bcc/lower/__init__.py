"""lower: run the pass list on a captured graph and compile it (inductor), hand it to Dynamo (backend) or export it."""
