"""The token operations vitprune inserts: pure functions and the leaf modules that call them."""
