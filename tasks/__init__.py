"""One module per DVC stage: arguments in, params section in, one library call, outputs written atomically."""
