from carlos.cli import main

main()
