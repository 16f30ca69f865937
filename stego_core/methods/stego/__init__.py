"""methods.stego"""
