from scope.cli import app

app(prog_name="scope")
