"""engine/hf"""
