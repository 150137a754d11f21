"""The conversation service: context building, titles, attachments, export and import."""
