"""Widgets: each renders one kind of picture from plain data and knows nothing about traces or threads."""
