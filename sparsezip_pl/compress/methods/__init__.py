"""One file per method; each registers itself with :func:`sparsezip_pl.compress.register_method`.

Every module here is imported when the registry is first used, so adding a method is adding a
file (and its test). See ``random.py`` for the smallest complete example.
"""
