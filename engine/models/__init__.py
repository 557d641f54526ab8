"""Model families implemented by the engine."""
