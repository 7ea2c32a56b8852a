"""What client and server share: the stack codec, the graph IR, keys and errors."""
