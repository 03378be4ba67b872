"""From what a person writes to what the network reads: the tokenizer, Gemma's chat format,
image files to pixels, and the processor that lays text and image tokens out as `Inputs`."""
