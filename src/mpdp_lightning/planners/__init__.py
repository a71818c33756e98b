"""What acts in the world model: MBPO's branched rollouts and COPlanner's uncertainty-aware
planner (UP-MPC)."""
