from desensitize.cli import app

app()
