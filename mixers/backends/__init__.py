"""Op backends. ``torch_backend`` is the built-in plugin registering the pure-torch implementations."""
