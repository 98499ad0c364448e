"""A model -> graphs of its blocks: example inputs, the torch.fx and torch.export front-ends, shapes and FLOPs."""
