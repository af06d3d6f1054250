"""smtpgate's built-in plugins, one module per check.

They are found through the ``smtpgate.plugins`` entry points like any
third-party plugin; the core never imports this package.
"""
