"""Dataset sources, transforms, static canvases and the input loaders."""
