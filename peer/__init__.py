"""shoal.peer"""
