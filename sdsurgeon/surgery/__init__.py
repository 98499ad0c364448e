"""Passes over the user's model: inject gates, replay a recipe, fold gates into weights."""
