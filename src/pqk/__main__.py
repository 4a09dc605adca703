from pqk.cli import main

main()
