"""Command-line interface: one small module per command, each only parsing arguments
and calling one library function. ``main.py`` assembles them into the ``airysort``
command."""
