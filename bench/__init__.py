"""smtpgate benchmark harness.

Run ``python3 -m bench --help``. Everything it starts (smtp-sink, Postfix,
the proxy under test, load generators) talks to 127.0.0.1 only and is torn
down on exit, including on errors and Ctrl-C.
"""
