"""shoal.optim"""
