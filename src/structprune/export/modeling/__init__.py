"""Modeling code shipped inside exported folders (imports only torch and transformers)."""
