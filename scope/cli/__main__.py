from scope.cli import main

main()
