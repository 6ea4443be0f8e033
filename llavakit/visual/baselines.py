"""placeholder: filled by the baselines helper"""
