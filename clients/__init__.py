"""Clients: the terminal client and the load generator."""
