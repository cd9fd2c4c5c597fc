"""Paying per job over TON payment channels (the official contract).

Pure cores: vouchers (:mod:`.vouchers`), contract messages (:mod:`.messages`),
the channel lifecycle (:mod:`.channelstate`), the settlement policy
(:mod:`.settlement`), the cooperative close terms (:mod:`.closeterms`), pay
frames (:mod:`.frames`) and their rules of order per stream
(:mod:`.connection`), TON address forms (:mod:`.addresses`), errors
(:mod:`.errors`). Durable state: the worker's channel store (:mod:`.store`), the
client's channel book (:mod:`.payerbook`) and voucher log (:mod:`.voucherlog`).
Chain access: the toncenter client with its retries and typed transactions
(:mod:`.toncenter`), the wallet and its confirmed transfers (:mod:`.wallet`),
channels as the chain shows them (:mod:`.chain`). Trio side: :mod:`.payer`
(client; its channels and pay streams in :mod:`.payerchannel`, the chain side of
opening them in :mod:`.deposits`), :mod:`.payee` (worker) and :mod:`.service`, which joins them to
``/cocoon/pay/1``. Knows nothing of jobs: the job layer asks it through the
small protocol it declares.
"""
