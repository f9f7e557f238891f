"""Example tasks of the kinds ops teams run: e-mail, report export, webhooks, clean-up."""
