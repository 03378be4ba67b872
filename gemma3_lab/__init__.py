"""gemma3_lab"""
