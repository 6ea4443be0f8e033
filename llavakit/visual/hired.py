"""placeholder: filled by the hired helper"""
