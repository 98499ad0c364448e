"""Passes over the user's model, in place: inject gates, replay a recipe, install rewritten graphs, fold, prune."""
