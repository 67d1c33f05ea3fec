"""The stages a message passes: intake, consent, route, deliver, receipts; plus the ledger."""
