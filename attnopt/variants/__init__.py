"""Variants of attention that a site can be rewritten into: exact, agent, linear, mediator."""
