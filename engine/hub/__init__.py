"""Where models come from.

    registry.py  the named models of models.toml, and where their files live
    download.py  fetching them, resumably and checked
"""
