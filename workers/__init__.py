"""What runs next to the engine: the worker, its engines, the commit script."""
