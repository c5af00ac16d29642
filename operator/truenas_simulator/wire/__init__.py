"""The simulator's HTTP side (aiohttp): each endpoint turns requests into ``Simulator.call`` and the
middleware's exceptions into its wire format; ``server.py`` assembles them into one app."""
