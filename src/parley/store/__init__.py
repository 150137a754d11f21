"""The store: engine, schema and one repository per aggregate. The only package with SQL."""
