"""Offline compiler (workstation side). Not built yet: see the README."""
