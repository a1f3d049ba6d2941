"""dncut"""
