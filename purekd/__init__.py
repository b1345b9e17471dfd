"""purekd."""
