"""vla_actor"""
