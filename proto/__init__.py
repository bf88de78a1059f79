"""Contracts shared by the router (``server``) and the workers (``workers``).

Nothing here imports ``server`` or ``workers``; both depend on this package.
"""
