"""The `tandem` command line: the room above everything it assembles.

Nothing in graph/, nodes/, routing/, serving/ or bench/ imports from here.
"""
