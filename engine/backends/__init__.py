"""Backends: each one implements the operators of `engine.model` on one kind of device."""
