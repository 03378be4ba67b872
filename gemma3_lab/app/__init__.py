"""The two front ends: the command line (`python -m gemma3_lab`) and the Gradio web app (`ui`)."""
