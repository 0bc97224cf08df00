"""libero_env"""
