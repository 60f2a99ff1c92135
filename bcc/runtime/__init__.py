"""runtime: the module users call (trajectory state, caches) and the plain hook reference it is tested against."""
