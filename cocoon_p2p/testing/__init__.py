"""Test helpers that ship with the library, as :mod:`trio.testing` does.

A tiny ONNX model (:mod:`.tinymodel`), the payment-channel contract in TON's
emulator (:mod:`.emulator`), and a local TON chain behind the toncenter API
(:mod:`.localchain`). Nothing else in the library imports this package.
"""
