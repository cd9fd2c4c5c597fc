"""Test helpers that ship with the library, as :mod:`trio.testing` does.

A tiny ONNX model (:mod:`.tinymodel`), the payment-channel contract in TON's
emulator (:mod:`.emulator`), a local TON chain behind the toncenter API
(:mod:`.localchain`), node programs as child processes (:mod:`.processes`), and a
network lab of real namespaces, public hosts and homes behind NATs (:mod:`.netlab`).
Nothing else in the library imports this package.
"""
